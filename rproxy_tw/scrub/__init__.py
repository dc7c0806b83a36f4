"""
Traffic scrubbing: rate limits, IP policy, the WAF and flood shedding, as
pure pieces (this package's modules) and thin request filters over them
(L{rproxy_tw.scrub.filters}) that every front end runs through the pipeline.
"""
