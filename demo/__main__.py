"""``python -m demo``: the demo recipe (see demo/recipe.py)."""

from demo.recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
