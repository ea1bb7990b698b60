-- The default application's main script: runs once when the "=lua+stage" stage starts.
log4cxx.info("stage started")
