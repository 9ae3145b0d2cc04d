WHO = "iso-b:pkg.sub.deep"
