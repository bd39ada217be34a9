-- One fixed request (the URL given to wrk), as fast as the stack answers.
dofile("report.lua")
