"""IPython extension loaded into every Python kernel: E2B's extracted chart data.

A matplotlib figure shown in a cell gets, beside its PNG, an ``e2b/chart`` representation made by
``e2b_charts`` (E2B's own extractor, from PyPI): line, scatter, bar, pie, box-and-whisker and
several axes as a superchart, in the shape the SDKs' ``Chart`` types read. The server sends it as
the result's ``chart``.
"""

from __future__ import annotations

from typing import Any

from IPython.core.formatters import BaseFormatter
from traitlets import ObjectName, Unicode


class ChartFormatter(BaseFormatter):  # type: ignore[misc]
    format_type = Unicode("e2b/chart")
    print_method = ObjectName("_repr_e2b_chart_")
    _return_type = (dict,)

    def __call__(self, obj: Any) -> dict[str, Any] | None:
        from matplotlib.figure import Figure

        if not isinstance(obj, Figure):
            return None
        from e2b_charts import chart_figure_to_dict

        try:
            return chart_figure_to_dict(obj) or None
        except Exception:  # noqa: BLE001 - a chart we cannot read still has its PNG
            return None


def load_ipython_extension(ip: Any) -> None:
    ip.display_formatter.formatters["e2b/chart"] = ChartFormatter(parent=ip.display_formatter)
