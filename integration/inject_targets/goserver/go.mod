module injecttarget

go 1.19
