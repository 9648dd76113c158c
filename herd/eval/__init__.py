"""Evaluation whose every score is bound to the exact model that earned it.

    import herd, herd.eval
    llm = herd.load("smollm2-135m")
    report = herd.eval.evaluate(llm, ["mc-arithmetic", "perplexity"], limit=50, seed=0)
    herd.eval.save(report, "report.json")
    ok, findings = herd.eval.verify(herd.eval.load_report("report.json"), llm)

Tasks: see herd.eval.tasks.TASKS. Backends: herd's engine in-process, or any OpenAI-compatible server.
"""

from herd.eval.report import digest, load as load_report, save
from herd.eval.run import evaluate
from herd.eval.tasks import TASKS, make_task

__all__ = ["TASKS", "digest", "evaluate", "load_report", "make_task", "save"]
