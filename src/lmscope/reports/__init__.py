"""Reports: results files and plots."""
