import helpers

from . import WHO as _package_who

PACKAGE = _package_who
WHO = "iso-b:pkg.x"
HELPERS = helpers.WHO
