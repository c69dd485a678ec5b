"""apply: run a Plan against the atlas (`execute`, execute.py), saving the state after every step.

execute.py lists the steps in order; run.py holds what they share; pipeline.py schedules converts and
ingests on the executor; allocation.py makes room for them; deletes.py takes out what must go; runlog.py
keeps the run's log and figures. Nothing imports this package back (api.py calls it).
"""

from soma_manifest.apply.execute import execute
from soma_manifest.apply.run import DEFAULT_CHUNK_NNZ, DEFAULT_GRACE_S
from soma_manifest.reports import ApplyReport, Reporter, SilentReporter

__all__ = ["DEFAULT_CHUNK_NNZ", "DEFAULT_GRACE_S", "ApplyReport", "Reporter", "SilentReporter", "execute"]
