WHO = "iso-a:pkg.sub.deep"
