WHO = "iso-a:pkg"
