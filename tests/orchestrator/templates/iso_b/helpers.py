WHO = "iso-b:helpers"
