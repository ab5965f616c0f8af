"""Human feedback: a labeling web app (`tidal label`), its SQLite store, agreement statistics
and exports in tidal's rankings / comparisons formats (see docs/feedback.md)."""
