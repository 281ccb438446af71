"""One exception tree: every error a user can cause names the file, key, row or element."""


class LfmError(Exception):
    """Base class of every error lfm-zonal raises on purpose (printed without traceback)."""


class InputError(LfmError, ValueError):
    """Bad user input: a file, a scenario key, a grid name, a bid row, a horizon."""


class UnknownGridError(InputError):
    """A grid name that is no built-in grid, SimBench code or file (a scenario names where
    it was given)."""


class HorizonError(InputError):
    """A horizon the grid's own profiles cannot give (a scenario names where its start was
    given)."""


class GridError(LfmError, ValueError):
    """A grid that cannot be modelled as asked (names the offending element)."""


class PowerFlowNotConverged(LfmError):
    """An AC power flow did not converge (names the MTU)."""


class WorkerDied(LfmError):
    """A worker process of a command ended without its result (killed when out of memory).

    Not a user mistake: the command line exits with code 1 for it, not 2."""


class SolverError(LfmError):
    """An LP the solver did not solve to optimality (names the LP and the solver's status).

    Not a user mistake: the command line exits with code 1 for it, not 2."""
