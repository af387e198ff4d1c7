-- wrk script: POST one PNG as multipart/form-data to the image endpoint.
-- usage: wrk -t2 -c32 -d10s -s bench/upload.lua http://127.0.0.1:8000/models/mnist/predict
-- the image comes from the environment variable IMAGE (default tests/data/mnist/0000.png), its part's
-- Content-Type from IMAGE_TYPE (default image/png)
local path = os.getenv("IMAGE") or "tests/data/mnist/0000.png"
local f = assert(io.open(path, "rb"))
local image = f:read("*all")
f:close()
local image_type = os.getenv("IMAGE_TYPE") or "image/png"
local boundary = "convservebenchboundary"
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
  .. 'Content-Disposition: form-data; name="file"; filename="image.' .. image_type:gsub("image/", "") .. '"\r\n'
  .. "Content-Type: " .. image_type .. "\r\n\r\n" .. image .. "\r\n--" .. boundary .. "--\r\n"
