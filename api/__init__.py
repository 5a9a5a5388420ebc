"""The HTTP API: validates, inserts, answers.  Sending is the dispatchers' work, never the API's."""
