"""The Textual dashboard: a thin subscriber of the Runtime's event stream (see STYLE.md)."""
