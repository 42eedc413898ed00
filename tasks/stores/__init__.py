"""The built-in stores; ``tasks.store`` registers each by URL scheme when first asked for one."""
