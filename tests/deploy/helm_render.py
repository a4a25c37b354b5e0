"""A tiny renderer for this repo's Helm chart, so tests can check it without a helm binary.

It supports only the template subset deploy/helm/tta-runtime uses:
  {{ .Values.a.b }}  {{ .Release.Name }}  {{ .Chart.Name }}  {{ . }}  {{ $.Values.x }}  "strings"  numbers
  pipelines with: quote, nindent N, indent N, toYaml, default X; functions include "name" ARG, toYaml ARG, not ARG
  {{ define "name" }} / {{ if }} / {{ else }} / {{ with }} / {{ end }}, {{/* comments */}}
  {{- and -}} whitespace trimming.
Anything else raises, so a template that drifts outside the subset fails loudly instead of
rendering wrongly.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _truthy(v) -> bool:
    # Go templates: false, 0, nil and empty strings/collections are false
    return bool(v)


def _to_yaml(v) -> str:
    # Helm's toYaml: block style, sorted keys, no trailing newline
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


class Renderer:
    def __init__(self, chart_dir: str | Path, values: dict | None = None, release: str = "test",
                 namespace: str = "default"):
        self.chart_dir = Path(chart_dir)
        chart = yaml.safe_load((self.chart_dir / "Chart.yaml").read_text())
        defaults = yaml.safe_load((self.chart_dir / "values.yaml").read_text()) or {}
        self.root = {
            "Values": _merge(defaults, values or {}),
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
            "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion", "")},
        }
        self.defines: dict[str, list] = {}

    # --- parsing: text and actions into a tree of nodes ---------------------------------------
    def _tokens(self, src: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        pos, trim_next = 0, False
        for m in ACTION.finditer(src):
            text = src[pos:m.start()]
            if trim_next:
                text = text.lstrip()
            if m.group(1):
                text = text.rstrip()
            out.append(("text", text))
            body = m.group(2)
            if not (body.startswith("/*") and body.endswith("*/")):
                out.append(("action", body))
            pos, trim_next = m.end(), bool(m.group(3))
        text = src[pos:]
        out.append(("text", text.lstrip() if trim_next else text))
        return out

    def _parse(self, tokens: list, i: int = 0, stop: tuple = ()) -> tuple[list, int, str | None]:
        nodes: list = []
        while i < len(tokens):
            kind, body = tokens[i]
            i += 1
            if kind == "text":
                nodes.append(("text", body))
                continue
            word = body.split(None, 1)[0]
            if word in ("end", "else"):
                if word not in stop:
                    raise ValueError(f"unexpected {{{{ {word} }}}}")
                return nodes, i, word
            if word in ("if", "with"):
                expr = body.split(None, 1)[1]
                then, i, ended = self._parse(tokens, i, ("end", "else"))
                other: list = []
                if ended == "else":
                    other, i, _ = self._parse(tokens, i, ("end",))
                nodes.append((word, expr, then, other))
            elif word == "define":
                name = shlex.split(body)[1]
                self.defines[name], i, _ = self._parse(tokens, i, ("end",))
            elif word in ("range", "template", "block", "tpl"):
                raise ValueError(f"{word} is outside the supported subset")
            else:
                nodes.append(("expr", body))
        if stop:
            raise ValueError("missing {{ end }}")
        return nodes, i, None

    # --- evaluation ----------------------------------------------------------------------------
    def _lookup(self, path: str, dot):
        if path == ".":
            return dot
        base, rest = (self.root, path[1:]) if path.startswith("$") else (dot, path)
        for part in [p for p in rest.split(".") if p]:
            base = base.get(part) if isinstance(base, dict) else None
        return base

    def _atom(self, word: str, dot):
        if word.startswith('"'):
            return word[1:-1]
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word.startswith(".") or word.startswith("$"):
            return self._lookup(word, dot)
        raise ValueError(f"unsupported term {word!r}")

    def _call(self, words: list[str], dot, piped=None):
        fn, args = words[0], [self._atom(w, dot) for w in words[1:]]
        if piped is not None or (fn in FUNCS and len(args) < FUNCS[fn]):
            args.append(piped)
        if fn == "include":
            return self._run(self.defines[args[0]], args[1]).strip("\n")
        if fn == "quote":
            return '"' + _gostr(args[0]).replace('"', '\\"') + '"'
        if fn == "toYaml":
            return _to_yaml(args[0])
        if fn == "nindent":
            return "\n" + _indent(_gostr(args[1]), args[0])
        if fn == "indent":
            return _indent(_gostr(args[1]), args[0])
        if fn == "default":
            return args[1] if _truthy(args[1]) else args[0]
        if fn == "not":
            return not _truthy(args[0])
        raise ValueError(f"unsupported function {fn!r}")

    def _eval(self, expr: str, dot):
        value, first = None, True
        for stage in [s.strip() for s in expr.split("|")]:
            words = shlex.split(stage, posix=False)
            if first and len(words) == 1 and words[0] not in FUNCS:
                value = self._atom(words[0], dot)
            else:
                value = self._call(words, dot, None if first else value)
            first = False
        return value

    def _run(self, nodes: list, dot) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "expr":
                out.append(_gostr(self._eval(node[1], dot)))
            elif node[0] == "if":
                out.append(self._run(node[2] if _truthy(self._eval(node[1], dot)) else node[3], dot))
            elif node[0] == "with":
                v = self._eval(node[1], dot)
                out.append(self._run(node[2], v) if _truthy(v) else self._run(node[3], dot))
        return "".join(out)

    def render_file(self, path: Path) -> str:
        nodes, _, _ = self._parse(self._tokens(path.read_text()))
        return self._run(nodes, self.root)

    def render(self) -> dict[str, str]:
        """{template file name: rendered text}; _helpers.tpl is parsed first for its defines."""
        templates = self.chart_dir / "templates"
        for tpl in sorted(templates.glob("*.tpl")):
            self._parse(self._tokens(tpl.read_text()))
        return {p.name: self.render_file(p) for p in sorted(templates.iterdir())
                if p.suffix in (".yaml", ".yml", ".txt")}

    def manifests(self) -> list[dict]:
        """Every non-empty YAML document the chart renders."""
        docs = []
        for name, text in self.render().items():
            if name.endswith(".txt"):
                continue
            docs += [d for d in yaml.safe_load_all(text) if d]
        return docs


FUNCS = {"include": 2, "quote": 1, "toYaml": 1, "nindent": 2, "indent": 2, "default": 2, "not": 1}


def _gostr(v) -> str:
    if v is None:
        return ""  # Helm prints a missing value as empty (with a warning)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _indent(text: str, n: int) -> str:
    return "\n".join((" " * n + line) if line else line for line in text.split("\n"))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
