module hupt.test/goserver

go 1.19
