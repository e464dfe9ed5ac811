"""Layer files people open: OpenRaster (`ora`), the PNG folder as a ZIP (`png`), and
Photoshop (`psd`), each written from a `LayeredSample` and read back into one."""
