"""TEMPORARY alias of images.agnhost (see lab/images/__init__.py): the same module when imported, the same
program under `python -m lab.images.agnhost`."""
import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("images.agnhost", run_name="__main__", alter_sys=True)
else:
    from images import agnhost

    sys.modules[__name__] = agnhost
