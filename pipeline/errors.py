"""The one family of refusals (a leaf: imports nothing).

A ``Refusal`` is what a job declines to do before (or instead of) doing work: a bad option, a model that
cannot do the request, an output folder another run holds. Every job prints it the same way, one line
``refused: <message>`` and exit status 2 (jobs/common.py ``run_job``), so its message names the fix.
"""

from __future__ import annotations


class Refusal(Exception):
    """Base of every refusal; subclasses keep the built-in base their callers catch (ValueError, ...)."""
