from setuptools import setup

setup()

# Refresh Twisted's plugin cache so `twistd rproxy` is found at once
# (twistd also rebuilds it on first use when the folder is writable).
try:
    from twisted.plugin import IPlugin, getPlugins

    list(getPlugins(IPlugin))
except Exception:
    pass
