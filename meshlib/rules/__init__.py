"""Configuration documents: pydantic models, YAML loading and whole-set validation.

Rules arrive as YAML or JSON documents (one per kind and service). They are validated whole:
a set with any problem is refused, and the error lists every problem with the document, the
field path and the reason, so an operator fixes a file in one pass. Nothing here does IO apart
from `load_file` reading its file.

One module per job: `models` (a model per kind, durations and other shared field types), `errors`
(problems, and pydantic's errors turned into them), `checks` (one document, a set, references),
`loading` (YAML text, files, raw documents), `ruleset` (RuleSet) and `file` (watching a file).
"""

from meshlib.rules import checks, errors, loading, models, ruleset
from meshlib.rules.checks import *  # noqa: F403
from meshlib.rules.errors import *  # noqa: F403
from meshlib.rules.loading import *  # noqa: F403
from meshlib.rules.models import *  # noqa: F403
from meshlib.rules.ruleset import *  # noqa: F403

__all__ = [name for module in (checks, errors, loading, models, ruleset) for name in module.__all__]
