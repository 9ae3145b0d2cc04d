WHO = "iso-b:late"
