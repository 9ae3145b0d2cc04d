WHO = "iso-b:lazy_helper"
