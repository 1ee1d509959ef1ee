"""render: the deploy YAML -> serveConfigV2. Copies the Serve config, verbatim, into the RayService
manifest's `serveConfigV2: |` literal block, leaving every other line as it was, and reports drift."""

from __future__ import annotations

import difflib
import re

import yaml


class RenderError(ValueError):
    pass


_BLOCK_HEADER = re.compile(r"^(?P<indent> *)serveConfigV2: *\|(?P<chomp>[-+]?) *(#.*)?$")
_ANY_HEADER = re.compile(r"^ *serveConfigV2:")


def canonical(text: str) -> str:
    """What the literal block holds for `text`: each line without trailing whitespace, no trailing
    blank lines, one final newline (YAML's default "clip" chomping)."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _block_span(lines: list[str]) -> tuple[int, int, int]:
    """(header line, end of the block's content, the header's indentation)."""
    headers = [i for i, line in enumerate(lines) if _BLOCK_HEADER.match(line)]
    if not headers:
        if any(_ANY_HEADER.match(line) for line in lines):
            raise RenderError("serveConfigV2 must be a plain literal block (`serveConfigV2: |`) for render to fill it")
        raise RenderError("the manifest has no `serveConfigV2: |` block")
    if len(headers) > 1:
        raise RenderError(f"the manifest has {len(headers)} `serveConfigV2: |` blocks; render fills exactly one")
    start = headers[0]
    if _BLOCK_HEADER.match(lines[start]).group("chomp"):
        raise RenderError("serveConfigV2 must use the default chomping (`|`, not `|-` or `|+`)")
    indent = len(_BLOCK_HEADER.match(lines[start]).group("indent"))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay outside it
        end -= 1
    return start, end, indent


def _load_all(text: str) -> list:
    return [doc for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


def served_config_text(manifest_text: str) -> str:
    """The serveConfigV2 string of the manifest's one RayService."""
    found = [doc["spec"]["serveConfigV2"] for doc in _load_all(manifest_text)
             if isinstance(doc, dict) and doc.get("kind") == "RayService"
             and isinstance(doc.get("spec"), dict) and "serveConfigV2" in doc["spec"]]
    if len(found) != 1:
        raise RenderError(f"expected one RayService with spec.serveConfigV2, found {len(found)}")
    if not isinstance(found[0], str):
        raise RenderError("spec.serveConfigV2 must be a string (the Serve config as YAML text)")
    return found[0]


def render(deploy_text: str, manifest_text: str) -> str:
    """The manifest with its serveConfigV2 block replaced by `deploy_text` (all other lines unchanged)."""
    body = canonical(deploy_text)
    first = next((line for line in body.splitlines() if line.strip()), "")
    if first[:1].isspace():
        raise RenderError("the deploy YAML's first line must not be indented "
                          "(YAML would take it for the block's indentation)")
    lines = manifest_text.splitlines()
    start, end, indent = _block_span(lines)
    pad = " " * (indent + 2)
    block = [pad + line if line else "" for line in body.splitlines()]
    rendered = "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"
    if canonical(served_config_text(rendered)) != body:  # never write a manifest that does not say what we meant
        raise RenderError("the rendered serveConfigV2 does not read back as the deploy YAML")
    return rendered


def drift(deploy_text: str, manifest_text: str, deploy_name: str = "deploy",
          manifest_name: str = "manifest") -> str | None:
    """A unified diff (deploy YAML -> the manifest's serveConfigV2) when they differ, else None."""
    want, have = canonical(deploy_text), canonical(served_config_text(manifest_text))
    if want == have:
        return None
    return "".join(difflib.unified_diff(want.splitlines(True), have.splitlines(True),
                                        f"{deploy_name}", f"{manifest_name}: spec.serveConfigV2"))
