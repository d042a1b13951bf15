"""Making the plugin's operators findable: linking this repository into FiftyOne's plugins
folder when FiftyOne does not find the plugin yet."""

from __future__ import annotations

from pathlib import Path

from . import DemoError

PLUGIN = "@ntt/no-time-to-train"


def ensure_plugin() -> str | None:
    """Make the plugin's operators findable; returns a note when it linked the plugin into
    FiftyOne's plugins folder."""
    import fiftyone as fo
    import fiftyone.operators as foo

    uri = f"{PLUGIN}/build_memory_bank"
    try:
        foo.get_operator(uri)
        return None
    except ValueError:
        pass
    repo = Path(__file__).resolve().parents[2]
    link = Path(fo.config.plugins_dir) / "ntt-no-time-to-train"
    if not (repo / "fiftyone.yml").is_file() or link.exists() or link.is_symlink():
        raise DemoError(
            f"FiftyOne does not find the plugin {PLUGIN} in {fo.config.plugins_dir}: put a copy of the repository "
            "(with fiftyone.yml) there, or set FIFTYONE_PLUGINS_DIR to a folder that holds one"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(repo, target_is_directory=True)
    foo.get_operator(uri)
    return f"installed the plugin {PLUGIN}: {link} -> {repo}"


def operator(name: str):
    import fiftyone.operators as foo

    return foo.get_operator(f"{PLUGIN}/{name}")
