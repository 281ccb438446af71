"""The grid stage: a pandapower grid and its profiles in, AC states and their linearisation out.

``sources`` (built-in, SimBench and JSON grids, their limits), ``profiles`` (the horizon's
load and generation per MTU), ``powerflow`` (one network model, AC power flow per MTU),
``violations`` (the limits' tolerances and how far a state is beyond them),
``sensitivity`` (Jacobian sensitivities of loading and voltage to injections) and
``linear`` (the linearised grid of the MTUs to clear, seen through market areas).
"""
