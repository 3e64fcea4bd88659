"""Whole jobs simulated with many virtual devices: the real coordinator engine and device code, no HTTP.

``simulate_job`` (``whole_job``) is the entry point; the parts: ``splits`` (how rows are dealt),
``data`` (the pool, its test rows, the devices' frames), ``devices`` (the agent's worker per
device, in memory), ``executors`` (in this process or on Ray), ``dropouts`` (who drops where),
``job`` (the driver that plays the network and the clock), ``summary`` (summary.json).
``server.simulate`` keeps the protocol-only simulation of one SecAgg+ round.
"""
