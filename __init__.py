"""This folder is the graphtricks repository; the package is the ``graphtricks/`` folder inside it.

Python looks for ``graphtricks`` in the current folder before it asks the finder of an editable
install (``pip install -e .``). From the folder that holds a clone named ``graphtricks``, the
clone itself would then be imported as an empty namespace package (no ``rewrite``, no
``__version__``, nothing said). This file makes that import give the package inside instead.
"""

import importlib.util as _util
import os as _os
import sys as _sys

_package = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "graphtricks")
_spec = _util.spec_from_file_location(
    __name__, _os.path.join(_package, "__init__.py"), submodule_search_locations=[_package]
)
_module = _util.module_from_spec(_spec)
_sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
_spec.loader.exec_module(_module)
