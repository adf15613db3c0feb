module hupt.test/udpgo

go 1.19
