-- Every request a new URL (/d/1, /d/2, ...): each one a miss that the cache stores.
counter = 0
request = function()
    counter = counter + 1
    return wrk.format("GET", "/d/" .. counter)
end
