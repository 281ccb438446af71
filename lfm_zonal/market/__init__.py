"""The market stage: offers in, accepted bids, dispatch and costs out.

``resources`` (flexible units and their offers), ``bids`` (bid steps per market area),
``needs`` (the DSO's needs per area for the needs-based market), ``lp`` (the one clearing
LP for nodal and zonal markets, solved by HiGHS), ``clearing`` (a market end to end:
areas, bids, the sequential AC loop, dispatch, KPIs) and ``opf_reference`` (pandapower's
AC OPF on the same offers, the yardstick of the nodal market).
"""
