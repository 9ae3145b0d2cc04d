WHO = "iso-a:late"
