WHO = "iso-a:helpers"
