"""Configuration documents: pydantic models, YAML loading and whole-set validation.

Rules arrive as YAML or JSON documents (one per kind and service). They are validated whole:
a set with any problem is refused, and the error lists every problem with the document, the
field path and the reason, so an operator fixes a file in one pass. Nothing here does IO apart
from `load_file` reading its file.

One module per job: `models` (a model per kind, durations and other shared field types), `errors`
(problems, and pydantic's errors turned into them), `checks` (one document, a set, references),
`loading` (YAML text, files, raw documents), `ruleset` (RuleSet) and `file` (watching a file).

Names are imported on first use (PEP 562): `RuleSet` and the errors load without pydantic, so
a process without rules (a local Mesh, a client) never builds the models; any other name loads
them (docs/decisions.md, "A client-only process pays little to import the mesh").
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.rules.checks import *  # noqa: F403
    from meshlib.rules.errors import *  # noqa: F403
    from meshlib.rules.loading import *  # noqa: F403
    from meshlib.rules.models import *  # noqa: F403
    from meshlib.rules.ruleset import *  # noqa: F403

_SUBMODULES = ("checks", "errors", "loading", "models", "ruleset")
# names whose modules import neither pydantic nor the models
_LIGHT = {"RuleSet": "ruleset", "RuleProblem": "errors", "RulesError": "errors", "EmptyRulesFile": "errors"}


def __getattr__(name: str) -> Any:
    import importlib

    def submodule(short: str) -> Any:
        return importlib.import_module(f"meshlib.rules.{short}")

    value: Any
    if name.startswith("__") and name != "__all__":  # probes (copy, inspect) load nothing
        raise AttributeError(f"module 'meshlib.rules' has no attribute {name!r}")
    if name in _LIGHT:
        value = getattr(submodule(_LIGHT[name]), name)
    elif name in _SUBMODULES:
        return submodule(name)
    elif name == "__all__":
        value = [n for short in _SUBMODULES for n in submodule(short).__all__]
    else:
        for short in _SUBMODULES:
            module = submodule(short)
            if name in module.__all__:
                value = getattr(module, name)
                break
        else:
            raise AttributeError(f"module 'meshlib.rules' has no attribute {name!r}")
    globals()[name] = value  # the next lookup is a plain attribute
    return value
