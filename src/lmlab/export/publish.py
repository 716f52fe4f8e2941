"""`lmlab publish`: a run (or an exported folder) on the Hugging Face Hub, with a model card.

    1. check the repo id, and (unless a dry run) that a token exists: before any work
    2. build the folder to upload, atomically: the Hugging Face export of the run (a LoRA
       run merged), or a copy of an exported folder's files; README.md (card.py) and
       loss_curve.png
    3. upload it: create the repo (private if asked), upload the folder

The token is read from the environment (HF_TOKEN) or the standard login
(`hf auth login`), only through `huggingface_hub.get_token()`, and handed to
`HfApi` in memory: it is never written to the folder, the card, a log or a run folder.
A dry run, or a machine with HF_HUB_OFFLINE=1, stops after step 2: the folder on disk is
exactly what would be uploaded. CI has no internet, so step 3 is tested against a stand-in
for `HfApi` only.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from lmlab.data.chat import DEFAULT_CHAT_TEMPLATE, END_OF_TURN, read_chat_template
from lmlab.errors import UserError
from lmlab.export.card import (
    LOSS_CURVE,
    draw_loss_curve,
    facts_from_folder,
    facts_from_run,
    model_card,
    read_evaluations,
)
from lmlab.fileio import atomic_directory, atomic_write_text

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
HF_FOLDER_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model")
"""What is copied from an exported folder: weights, configs, tokenizer, chat template."""


def check_repo_id(repo_id: str) -> str:
    """OWNER/NAME with the Hub's characters (letters, digits, - _ .), or a one-line error."""
    if not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UserError(
            f"--repo {repo_id!r} is not a Hub repo id: expected OWNER/NAME (letters, digits, "
            "'-', '_', '.'; not starting or ending with '-' or '.')"
        )
    return repo_id


def hub_token() -> str | None:
    """HF_TOKEN or the standard login's token, never from anywhere lmlab writes."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise UserError("publishing needs huggingface_hub: pip install 'lmlab[export]'") from None
    return get_token()


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def build_folder(
    source: str | Path,
    out: Path,
    *,
    repo_id: str,
    license: str = "other",
    evaluations: list[Path] | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the folder to upload to `out` (new, or replaced with `overwrite`)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source} does not exist: pass a run, a checkpoint or an exported folder")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: --out must name a folder")
    eval_rows = read_evaluations(list(evaluations or []))
    is_hf_folder = (source / "config.json").is_file() and not (source / "config.yaml").is_file()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if is_hf_folder:
            facts = facts_from_folder(source)
            copied = sorted({p for pattern in HF_FOLDER_FILES for p in source.glob(pattern)})
            if not any(p.suffix == ".safetensors" for p in copied):
                raise UserError(f"{source} has no .safetensors weights to publish")
            for path in copied:
                shutil.copy2(path, tmp / path.name)
            for stale in ("README.md", LOSS_CURVE):  # ours replace any that were there
                (tmp / stale).unlink(missing_ok=True)
            export = {"checkpoint": None, "max_logit_difference": None}
        else:
            from lmlab.export.hf import export_hf
            from lmlab.model.build import param_count
            from lmlab.runs.checkpoint import resolve_checkpoint

            export = export_hf(source, tmp / "model", dtype=dtype, merge_lora=True)
            for path in (tmp / "model").iterdir():
                path.rename(tmp / path.name)
            (tmp / "model").rmdir()
            resolved = resolve_checkpoint(export["checkpoint"])
            cfg = resolved.config
            facts = facts_from_run(resolved.path, resolved.run_dir, cfg, param_count(cfg.model))
        facts.evaluations = eval_rows
        template, _ = read_chat_template(tmp)
        facts.chat = template is not None
        if facts.chat and template.strip() == DEFAULT_CHAT_TEMPLATE.strip():
            facts.end_of_turn = END_OF_TURN.strip()
        has_curve = draw_loss_curve(facts.history, tmp / LOSS_CURVE)
        atomic_write_text(tmp / "README.md", model_card(facts, repo_id, license, has_curve))
    files = sorted(p.name for p in out.iterdir())
    return {
        "out": str(out),
        "repo": repo_id,
        "files": files,
        "checkpoint": str(export["checkpoint"]) if export["checkpoint"] else None,
        "max_logit_difference": export["max_logit_difference"],
    }


def upload(folder: Path, repo_id: str, *, private: bool, token: str) -> str:
    """Create the repo if needed and upload the folder; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload with lmlab publish",
        )
    except Exception as e:  # HTTP, connection and auth errors all end the command the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"upload to {repo_id} failed ({first}); the folder is at {folder}"
        ) from None
    return str(url)


def publish(
    source: str | Path,
    repo_id: str,
    *,
    out: str | Path | None = None,
    private: bool = False,
    dry_run: bool = False,
    license: str = "other",
    evaluations: list[Path] | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """The whole command; see the module docstring. Returns what was written and uploaded."""
    check_repo_id(repo_id)
    token = None
    if not dry_run:
        token = hub_token()
        if not token:
            raise UserError(
                "no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                "(or pass --dry-run to only write the folder)"
            )
    folder = Path(out) if out is not None else Path("publish") / repo_id.split("/")[1]
    result = build_folder(
        source,
        folder,
        repo_id=repo_id,
        license=license,
        evaluations=evaluations,
        dtype=dtype,
        overwrite=overwrite,
    )
    result["uploaded"] = False
    if dry_run:
        return result
    if is_offline():
        raise UserError(f"HF_HUB_OFFLINE is set: nothing uploaded; the folder is at {folder}")
    assert token is not None
    result["url"] = upload(folder, repo_id, private=private, token=token)
    result["uploaded"] = True
    return result
