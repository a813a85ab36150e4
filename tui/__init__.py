"""The Textual research cockpit: reads engine events, sends engine commands."""
