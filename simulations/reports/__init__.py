"""Reports: the audit of a run and its Markdown/HTML report, the privacy-utility frontier."""
