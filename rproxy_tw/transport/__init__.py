"""
Transport helpers shared by every front end (HTTP, raw TCP, the TLS
transport): writing to a socket without Twisted's buffering when it is
empty, and backpressure gates with named reasons.
"""
