"""Every week's exercise checks. Importing this package registers them all.

Each `weekN.py` module defines its exercises with `@exercise(...)`; modules are discovered
automatically, so adding a week needs no edit here.
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
