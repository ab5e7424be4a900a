SESSIONS = {"ann": "2024-01-01"}
