-- wrk script: POST the bytes of the file BODY_FILE with the Content-Type CONTENT_TYPE (a raw image, a JSON body).
local f = assert(io.open(assert(os.getenv("BODY_FILE"), "BODY_FILE is not set"), "rb"))
wrk.body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/octet-stream"
