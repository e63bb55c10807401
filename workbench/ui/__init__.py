"""Widget panels: the notebooks' interactive views, bound to the same functions the headless cells call (a package:
:mod:`.base` holds the panel machinery, :mod:`.panels` one panel per notebook).

Owns: ipywidgets controls, their layout, the busy state, what a panel caches between updates, and where a panel
action's run folder goes (:meth:`Panel.action_run`). Must not: validate parameters (:mod:`workbench.params`), measure
(:mod:`workbench.studies`), draw (:mod:`workbench.figures`) or write manifests itself (:mod:`workbench.runs` does).

Interactive runs have an identity: an action that computes a result (04's *train*, 06's *run more trials*) writes
into a run folder of its own, ``<out_dir>/panels/<action>-<UTC time>/``, with a ``manifest.json`` (kind "panel": the
notebook, the action, the notebook parameters that reproduce it and the ``workbench report`` command), so
``workbench runs`` lists it and ``workbench runs diff`` compares it. It never writes into a headless report's folders:
when ``out_dir`` is one (:func:`workbench.runs.report_of`), the run folder goes under ``runs/panels/<notebook>/``, and
06 refuses to add trials to the report's Optuna study.

A panel is built from a notebook's validated parameters and, where the headless cell already computed it,
that cell's result: displaying a panel never recomputes. Its controls start from the config the headless run
used (the preset plus the notebook's explicit overrides); choosing another preset resets them to that
preset's values. While a panel computes, its controls are disabled, its status says "computing..." and its
root carries the CSS class ``wb-busy``; long computations show a progress bar. What does not depend on a cheap
knob (the scenes, each estimator's raw R_samp, the untrained network) is cached on the panel, so a cheap
knob answers within a second. Panels work without a kernel: tests set ``control.value`` and read
``panel.result`` / ``panel.status.value`` / ``panel.image.value``.
"""

from .base import PANEL_DPI, Panel, plotly_bundle, show
from .panels import GradientPanel, LocalisationPanel, NormalisationPanel, SpectrumPanel, SweepPanel, TrainingPanel

__all__ = ["PANEL_DPI", "GradientPanel", "LocalisationPanel", "NormalisationPanel", "Panel", "SpectrumPanel", "SweepPanel",
           "TrainingPanel", "plotly_bundle", "show"]
