"""Validate params.yaml before any work: `python -m tasks.validate [PATH]`."""
from __future__ import annotations

import sys

from tasks.config import ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        params = load_params(argv[0] if argv else None)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"params OK: arms {', '.join(params.filter.arms)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
