WHO = "iso-b:pkg"
