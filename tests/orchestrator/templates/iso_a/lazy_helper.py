WHO = "iso-a:lazy_helper"
