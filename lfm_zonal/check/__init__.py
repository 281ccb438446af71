"""The AC check: the dispatch of a market put back into an AC power flow, and what it leaves.

``ac`` (power flow with the activations, violations and residual need per element and
MTU; the clearing's sequential loop judges each of its rounds here) and ``kpis`` (the KPI
schema: every column of kpis.csv with its unit, meaning and golden tolerance).
"""
