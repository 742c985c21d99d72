"""W&B runs for `lit-optim train`: one run per Hydra job, named after the job's overrides, and a fast offline start
when the W&B server cannot be used.

- **Offline, fast.** An online run (``logger.offline=false``) needs credentials and a reachable server. Without them,
  wandb fails at once (no API key) or waits 90 s for its server before giving up (a key, but no network), after which
  lit-optim would have fallen back to CSV. Both are checked here first, in a few seconds, and the run is logged
  offline instead -- what W&B itself does with ``WANDB_MODE=offline``: the run is kept in W&B's format, and
  ``wandb sync <run dir>`` uploads it later.
- **One run per job.** wandb keeps one global run per process, and Lightning's `WandbLogger` reuses it when it exists:
  the jobs of a Hydra multirun (one process) all went into the first job's run. `FinishWandbRun`, a Hydra callback
  (conf/train.yaml), finishes the run at the end of each job, whatever its outcome.
- **Named after the job.** A run without a ``logger.name`` takes the job's overrides (``optim=adamw_8bit``), the same
  words that name its multirun directory (``hydra.job.override_dirname``).
"""

from __future__ import annotations

import configparser
import netrc
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback as HydraCallback

PROBE_TIMEOUT_S = 3.0  # connecting to a reachable W&B server takes milliseconds; DNS included, a few seconds at most
DEFAULT_BASE_URL = "https://api.wandb.ai"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


def job_name() -> str | None:
    """The current Hydra job's overrides as Hydra writes them in directory names (``optim=adamw_8bit``), or None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().job.override_dirname or None
    except (ImportError, ValueError):  # not inside a Hydra job
        return None


def base_url() -> str:
    """The W&B server wandb would use: ``WANDB_BASE_URL``, else ``base_url`` from wandb's settings files, else its
    default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for settings in (Path("wandb") / "settings", config_dir / "settings"):  # the workspace's first, as wandb reads
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
            if parser.get("default", "base_url", fallback=None):
                return parser.get("default", "base_url")
        except (OSError, configparser.Error):
            continue
    try:
        from wandb.sdk.wandb_settings import Settings

        return str(Settings.model_fields["base_url"].default)
    except Exception:  # noqa: BLE001 - wandb's internals move between versions; its long-standing default then
        return DEFAULT_BASE_URL


def has_credentials(url: str) -> bool:
    """An API key in the environment, an identity token, or a netrc entry for the server at `url` (where `wandb
    login` puts it), looked up as wandb looks it up where this wandb shows how."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        # wandb's own lookup also accepts a key saved for the server its default URL stands in for (api.wandb.ai).
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    except ImportError:  # another wandb version: the netrc file by hand
        pass
    else:
        try:
            return read_netrc_auth(host=url) is not None
        except Exception:  # noqa: BLE001 - an entry wandb cannot read: let wandb itself say what is wrong with it
            return True
    parsed = urlparse(url)
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else [Path.home() / ".netrc", Path.home() / "_netrc"]
    for path in paths:
        try:
            entries = netrc.netrc(path)
        except (OSError, netrc.NetrcParseError):
            continue
        if any(entries.authenticators(h) for h in (parsed.netloc, parsed.hostname, "api.wandb.ai") if h):
            return True
    return False


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (name lookup included: it runs in a
    thread, because `socket.create_connection`'s timeout does not cover DNS)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def online_problem(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an online W&B run cannot start here (no credentials, server unreachable), or None if it can."""
    url = base_url()
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if not has_credentials(parsed.geturl()):
        return (f"not logged in to {url} (no WANDB_API_KEY and no netrc entry for {parsed.netloc}; `wandb login` "
                "adds one)")
    # Through a proxy (the *_PROXY variables, as wandb's HTTP client reads them), the proxy is what must answer.
    proxies = urllib.request.getproxies_environment()
    proxy = None if urllib.request.proxy_bypass_environment(parsed.hostname or "", proxies) else (
        proxies.get(parsed.scheme) or proxies.get("all"))
    target = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    if not reachable(target.hostname or "", port, timeout):
        via = f" through the proxy {target.hostname}:{port}" if proxy else ""
        return f"{url} cannot be reached{via} (tried for up to {timeout:g} s)"
    return None


def wandb_logger(cfg) -> Any:
    """Lightning's `WandbLogger` from the `logger` config node, not yet started: named after the job when the config
    gives no name, and offline (with a warning saying how to upload later) when an online run cannot start."""
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_warn

    overrides: dict[str, Any] = {}
    if cfg.get("name") is None and job_name():
        overrides["name"] = job_name()
    mode = str(cfg.get("mode") or os.environ.get("WANDB_MODE") or "").lower()
    if not cfg.get("offline", False) and mode not in OFFLINE_MODES:
        problem = online_problem()
        if problem:
            overrides["offline"] = True
            if cfg.get("log_model"):
                overrides["log_model"] = False  # Lightning refuses log_model with offline: nothing can be uploaded
            save_dir = cfg.get("save_dir") or "."
            rank_zero_warn(f"W&B: {problem}; logging offline under {save_dir}/wandb instead. Upload it later with "
                           "`wandb sync <run dir>`, or set logger.offline=true to skip this check.")
    logger = instantiate(cfg, **overrides)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        # Lightning always passes anonymous=None, and recent wandb (0.31) warns at every start that it has no effect.
        init.pop("anonymous", None)
    return logger


def finish_wandb_run(exit_code: int = 0) -> None:
    """Finish this process's W&B run, if there is one (a job that failed marks its run failed)."""
    wandb = sys.modules.get("wandb")  # a job that never started W&B has nothing to finish, nor to import
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


class FinishWandbRun(HydraCallback):
    """Hydra callback: end each job's W&B run when the job ends, so the next job of a multirun starts its own."""

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        finish_wandb_run(0 if getattr(job_return, "status", None) == JobStatus.COMPLETED else 1)
