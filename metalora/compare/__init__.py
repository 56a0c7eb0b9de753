"""``metalora compare``: train several recipes over several seeds, score them on the same held-out items,
and report means with 95% intervals and paired bootstraps against a reference (``study`` runs the
jobs, ``summary`` makes the tables and plots)."""

from metalora.compare.study import Study, run_study, study_record
from metalora.compare.summary import summarize, write_outputs

__all__ = ["Study", "compare", "run_study", "summarize", "write_outputs"]


def compare(study: Study, resamples: int = 10_000):
    """Run the study and write ``compare.json``, ``compare.md`` and ``plots/``; returns the summary."""
    results = run_study(study)
    summary = summarize(results, study.reference, resamples)
    write_outputs(study.out, study_record(study), results, summary)
    return summary
