"""Appends `pkg://lit_optim.conf` to every Hydra application's search path.

An existing app then selects lit_optim's optimizers with one defaults entry (``- optim: adamw_8bit``) and switches
them with ``optim=paged_adamw_8bit`` on the command line. Appended, not prepended: the app's own configs win any
name clash (Hydra takes the first match along the search path).
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LitOptimSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="lit-optim", path="pkg://lit_optim.conf")
