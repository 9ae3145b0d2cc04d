import helpers

from . import WHO as _package_who

PACKAGE = _package_who
WHO = "iso-a:pkg.x"
HELPERS = helpers.WHO
